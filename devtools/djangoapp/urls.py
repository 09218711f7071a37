from django.urls import path

from devtools.djangoapp import views

urlpatterns = [
    path("bump/<str:name>", views.bump),
    path("sleep/<str:seconds>", views.sleep),
]
